import pathlib
import sys

# Tests import `common`, `fl_server` and `fl_client` from the checkout, installed or not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
