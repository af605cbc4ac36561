"""The MONAI Label app's task code (configs, infer, train, active learning, scoring) for CDPDNet.

Imported as the top-level package ``lib`` (MONAI Label's app convention); ``apps/cdpdnet/main.py``
puts the repository root on ``sys.path`` (and ``PYTHONPATH`` for the server's subprocesses).
The model itself lives in the ``cdpdnet`` package, which knows nothing of MONAI Label.
"""
