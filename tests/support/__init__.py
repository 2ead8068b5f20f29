"""Helpers shared by the tests (no tests here): starting the trainer and tools
(runs), the console's expected lines (console_lines), Keras and legacy .pth
references (keras_helpers, legacy_pth), headless Chromium (chromium,
install_chromium.sh) and the fault-injection driver of tests/system/test_reliability.py
(fault_driver)."""
