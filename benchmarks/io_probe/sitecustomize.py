"""On PYTHONPATH (with the repo root): every Python process started with $ER_IO_COUNT_DIR set counts its storage reads.

See benchmarks/io_count.py; nothing is imported beyond the standard library until a hooked module is.
"""

import os

if os.environ.get("ER_IO_COUNT_DIR"):
    try:
        from benchmarks import io_count

        io_count.install()
    except ImportError:  # the repo root is not on PYTHONPATH: this process does not count
        pass
