import os
import sys

# the repo root on sys.path so `examples` and `bench` import without installation
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
