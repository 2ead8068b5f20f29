"""Opens a page in headless Chromium (Debian's package) through selenium and reports
what a reader would see: console errors, images that did not render, table rows."""

import os
import shutil
import tempfile

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
FLAGS = (
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
)

INSPECT = """
const images = Array.from(document.images).map(img => ({
  alt: img.alt, complete: img.complete, width: img.naturalWidth,
  scheme: img.src.split(':')[0]}));
const resources = performance.getEntriesByType('resource').map(r => r.name);
const rows = Array.from(document.querySelectorAll('#per-label tbody tr'))
  .map(tr => tr.getAttribute('data-label'));
return {images: images, resources: resources, rows: rows, title: document.title,
        text: document.body.innerText};
"""


def missing():
  """Why the browser cannot run here, or '' when it can."""
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.path.exists(path):
      return (
        f'{path} is missing; run tests/support/install_chromium.sh (as root), '
        'which `make test` does.'
      )
  return ''


def inspect(path):
  """Loads file `path`; returns {'console': [SEVERE messages], 'images', 'rows', ...}."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  profile = tempfile.mkdtemp(prefix='chexnet-chromium-')
  for flag in (*FLAGS, f'--user-data-dir={profile}'):
    options.add_argument(flag)
  options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    driver.get('file://' + os.path.abspath(path))
    driver.execute_async_script(  # Every image decoded (or failed) before looking.
      'const done = arguments[arguments.length - 1];'
      'Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))'
      '.then(() => done(null));'
    )
    page = driver.execute_script(INSPECT)
    page['console'] = [
      entry['message'] for entry in driver.get_log('browser') if entry['level'] == 'SEVERE'
    ]
    return page
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
