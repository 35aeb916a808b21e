"""Package list for setuptools (everything else is in pyproject.toml).

pyproject's ``packages.find`` cannot add a package that lives outside ``src/``: this maps
``tunelab.examples`` onto the repository's ``examples/`` folder, so the wheel carries the
shipped examples (``tunelab init --example NAME``) while the repository keeps one copy of each.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "tunelab.examples"],
      package_dir={"": "src", "tunelab.examples": "examples"})
