"""Test helpers live next to the tests (e.g. hub_server.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
