"""Packages of the wheel: the code, the templates and the generated sources. Each folder of generated/
(one per generated source) is listed as a package so its kernels ship as modules; the folders come
from generated/ itself, so a new family needs no change here."""
from pathlib import Path

from setuptools import setup

GENERATED = sorted(p.name for p in (Path(__file__).parent / "generated").iterdir() if p.is_dir())

setup(
    packages=["nsa_codegen", "nsa_codegen.codegen", "nsa_codegen.codegen.resources", "nsa_codegen.kernels",
              "nsa_codegen.templates", "nsa_codegen.generated", *(f"nsa_codegen.generated.{g}" for g in GENERATED)],
)
