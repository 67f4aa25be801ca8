"""The repository FUSE mount: one directory per attached layer, read-only.

`tree.py` (pure layer trees), `repository.py` (attached layers, read path), `ops.py`
(pyfuse3 handlers), `mount.py` (lifecycle). Only ops.py and mount.py import pyfuse3.
"""
