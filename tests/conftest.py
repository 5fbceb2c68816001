import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Let the suite run from a plain clone too (the README installs the package editable).
for sub in ("sdk", "training", "export"):
    p = str(ROOT / sub)
    if p not in sys.path:
        sys.path.insert(0, p)
