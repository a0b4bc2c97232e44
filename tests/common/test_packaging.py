"""Our import names belong to us alone: a top-level package that another installed
distribution also ships shadows it, and that distribution's users (`transformers` imports
Hugging Face's `kernels`) break on import."""

import importlib.metadata

import pytest

OURS = ["services", "selfspec_kernels", "benchmarks"]


@pytest.mark.parametrize("name", OURS)
def test_no_other_installed_distribution_ships_our_package(name):
    shipped_by = set(importlib.metadata.packages_distributions().get(name, []))
    assert shipped_by == {"selfspec"}, f"{name!r} is also shipped by {shipped_by - {'selfspec'}}"


def test_transformers_imports_beside_our_packages():
    from transformers.activations import ACT2FN

    import selfspec_kernels.backend  # noqa: F401

    assert "silu" in ACT2FN
