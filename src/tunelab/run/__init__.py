"""A run directory as one object: its paths, config, manifest, metrics and model.

``RunDir`` (``directory.py``) knows every path of ``runs/<name>/`` and whether it is a run and
has finished; ``Manifest`` (``manifest.py``) is its typed, versioned ``manifest.json``;
``metrics.py`` writes and reads ``metrics.jsonl`` and streams it to trackers; ``load.py`` loads
the run's model for every command that runs it.
"""

from tunelab.run.directory import RunDir, create_run, open_run
from tunelab.run.load import load_run_model
from tunelab.run.manifest import Manifest

__all__ = ["Manifest", "RunDir", "create_run", "load_run_model", "open_run"]
