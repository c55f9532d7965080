"""Loaded by every Python process of a test's `er` run (PYTHONPATH): logs each local file read through fsspec.

With ER_TEST_READ_LOG set, every LocalFileSystem open for reading appends "pid path" to that file, so a
test sees which files the driver, Ray Data tasks and Train workers opened, in every process.
"""

import os

if os.environ.get("ER_TEST_READ_LOG"):
    try:
        from fsspec.implementations.local import LocalFileSystem

        _open = LocalFileSystem._open

        def _logged_open(self, path, mode="rb", *args, **kwargs):
            if "r" in mode:
                with open(os.environ["ER_TEST_READ_LOG"], "a") as log:
                    log.write(f"{os.getpid()} {self._strip_protocol(path)}\n")
            return _open(self, path, mode, *args, **kwargs)

        LocalFileSystem._open = _logged_open
    except ImportError:
        pass
