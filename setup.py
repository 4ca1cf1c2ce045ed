"""Package discovery for the repository-root package (the rest of the build is in pyproject.toml).

The repository root is the ``longshard`` package, so setuptools' own discovery would install
``models``, ``train``, ... as top-level names; here every folder with an ``__init__.py`` (tests,
benchmarks and build outputs excluded) is installed under ``longshard.`` instead, and this file is
left out of the package it describes.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

EXCLUDE = ("tests", "tests.*", "benchmarks", "benchmarks.*", "build", "build.*")


def discovered_packages() -> list[str]:
    """``longshard`` and every sub-package under the repository root."""
    return ["longshard", *(f"longshard.{p}" for p in find_packages(".", exclude=EXCLUDE))]


class _BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        found = super().find_package_modules(package, package_dir)
        return [m for m in found if not (package == "longshard" and m[1] == "setup")]


if __name__ == "__main__":  # run by the build backend; importing longshard.setup does nothing
    setup(packages=discovered_packages(), cmdclass={"build_py": _BuildPy})
