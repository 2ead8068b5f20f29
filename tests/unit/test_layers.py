"""The import graph of the project's own modules: no cycles, and no arrow up.

Each package has a layer; a module may import its own package and any lower
layer, never a higher one. The order is the design: errors at the bottom (both
packages raise them), then the configs, the input pipeline, the runtime
plumbing, the model, the run directory, scoring, the report, training, and the
commands a user types on top. Imports inside functions count.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYERS = (
  ('chexnet_jax.errors',),
  ('configs',),
  ('input_pipeline',),
  ('chexnet_jax.runtime',),
  ('chexnet_jax.model',),
  ('chexnet_jax.run',),
  ('chexnet_jax.evaluation',),
  ('chexnet_jax.report',),
  ('chexnet_jax.training',),
  ('chexnet_jax',),  # The commands: main, evaluate, predict, score, benchmark, ...
)


def _modules():
  for package in ('chexnet_jax', 'input_pipeline', 'configs'):
    for path in sorted((ROOT / package).rglob('*.py')):
      name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
      yield name.removesuffix('.__init__'), path


MODULES = dict(_modules())


def layer_of(module):
  """The layer of the longest prefix of `module` that LAYERS names."""
  best = None
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + '.'):
        if best is None or len(prefix) > best[1]:
          best = (index, len(prefix))
  return best[0]


def imports_of(module, path):
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      submodules = [f'{node.module}.{alias.name}' for alias in node.names]
      names = [name for name in submodules if name in MODULES] or [node.module]
    else:
      continue
    found |= {name for name in names if name in MODULES and name != module}
  return found


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
  assert all(layer_of(module) is not None for module in MODULES)


def test_no_module_imports_a_higher_layer():
  upward = [
    f'{module} -> {target}'
    for module, targets in GRAPH.items()
    for target in targets
    if layer_of(target) > layer_of(module) and not module.endswith('__init__')
  ]
  assert upward == []


def _cycle_from(start):
  stack, on_stack = [(start, iter(sorted(GRAPH[start])))], [start]
  while stack:
    node, children = stack[-1]
    child = next(children, None)
    if child is None:
      stack.pop()
      on_stack.pop()
    elif child in on_stack:
      return on_stack[on_stack.index(child) :] + [child]
    elif len(on_stack) < len(GRAPH):
      stack.append((child, iter(sorted(GRAPH[child]))))
      on_stack.append(child)
  return None


def test_no_import_cycles():
  cycles = [cycle for cycle in map(_cycle_from, sorted(GRAPH)) if cycle]
  assert cycles == []


def test_every_subpackage_says_what_it_holds_and_may_import():
  packages = [path for path in (ROOT / 'chexnet_jax').iterdir() if path.is_dir()]
  packages = [path for path in packages if list(path.glob('*.py'))]
  assert len(packages) >= 4
  for package in packages:
    init = package / '__init__.py'
    assert init.exists(), f'{package} has no __init__.py'
    doc = ast.get_docstring(ast.parse(init.read_text())) or ''
    assert 'May import' in doc, f'{init} says nothing of what it may import'
