"""Entry for /crop; the Crop page itself is ui/crop.py.

Streamlit may run this file directly (its legacy pages/ mode), so it runs the app's shell, as app.py does: see
ui/shell.py."""
from ui.shell import run

run()
