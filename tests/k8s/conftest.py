"""Fixtures for the Kubernetes bundle tests (chart, kustomize, skaffold, Dockerfile)."""

from __future__ import annotations

import pytest
from k8s_support import helm_binary


@pytest.fixture(scope="session")
def helm() -> str:
    """The project's helm binary (installed by `make tools`); its absence fails, never skips."""
    return helm_binary()
