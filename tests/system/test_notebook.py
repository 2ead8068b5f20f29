"""notebooks/evaluate_checkpoint.ipynb runs to the end on the tiny run, and its AUROC
table is the one `python -m chexnet_jax.evaluate` prints."""

import os

import nbclient
import nbformat
import pytest

from chexnet_jax import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'evaluate_checkpoint.ipynb')
BOOTSTRAP = 40

pytestmark = pytest.mark.slow


def _stream_text(cell):
  return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')


def run_notebook(directory):
  """Executes the notebook with its kernel started in `directory`; the notebook
  and the error outputs of its cells."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    notebook, kernel_name='python3', timeout=300, resources={'metadata': {'path': directory}}
  ).execute()
  errors = [
    o
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for o in cell.outputs
    if o.output_type == 'error'
  ]
  return notebook, errors


def _auroc_table(text):
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('Pathology'))
  end = next(i for i, line in enumerate(lines) if line.startswith('Mean'))
  return '\n'.join(lines[start : end + 1])


def test_notebook_runs_and_its_table_equals_evaluate(tiny_run, capsys, monkeypatch):
  monkeypatch.setenv('CHEXNET_WORKDIR', tiny_run)
  monkeypatch.setenv('CHEXNET_CHECKPOINT', 'best')
  monkeypatch.setenv('CHEXNET_BOOTSTRAP', str(BOOTSTRAP))
  monkeypatch.setenv('CHEXNET_GALLERY', '2')
  notebook, errors = run_notebook(os.path.dirname(NOTEBOOK))
  outputs = '\n'.join(_stream_text(cell) for cell in notebook.cells if cell.cell_type == 'code')
  assert not errors
  images = [
    o
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for o in cell.outputs
    if 'image/png' in o.get('data', {})
  ]
  assert len(images) >= 3  # ROC curves and the gallery.

  assert (
    evaluate.main(
      [
        '--workdir',
        tiny_run,
        '--checkpoint',
        'best',
        '--bootstrap',
        str(BOOTSTRAP),
        '--gallery',
        '1',
      ]
    )
    == 0
  )
  assert _auroc_table(outputs) == _auroc_table(capsys.readouterr().out)
