"""The pull step of tartflow's deployments: run the flows from the tartflow installed in the
worker's own Python.

A runner's worker needs tartflow installed in the Python that runs ``prefect worker start``
anyway (the flows import it), and the distribution carries ``flows/``; so the deployment's
entrypoints (``flows/pull.py:pull_image``) are found next to the installed ``flows`` package:
the checkout itself for an editable install (``pip install -e .``), ``site-packages`` for a
plain one. Nothing depends on where ``prefect deploy`` ran, on the worker's directory or on an
environment variable, so plain ``prefect deploy --all`` and ``prefect worker start`` work.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["installed_code"]

ENTRYPOINT_FILES = ("flows/pull.py", "flows/prewarm.py")


class CodeNotFound(RuntimeError):
    pass


def installed_code() -> dict[str, str]:
    """Prefect pull step: change to the directory that holds the installed ``flows`` package.

    Returns ``{"directory": ...}`` as Prefect's ``set_working_directory`` does. Raises one line
    saying what to do when the flows are not there.
    """
    import flows

    root = Path(flows.__file__).resolve().parent.parent
    missing = [name for name in ENTRYPOINT_FILES if not (root / name).is_file()]
    if missing:
        raise CodeNotFound(
            f"tartflow's flows are not at {root} ({', '.join(missing)} missing): install tartflow "
            "(pip install <checkout>) into the Python that runs `prefect worker start`, or use the "
            "git_clone pull step in prefect.yaml"
        )
    os.chdir(root)
    return {"directory": str(root)}
