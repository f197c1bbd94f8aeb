"""Fixtures for the dashboard tests: one deployment with a trained model and a candidate, one real
`recsys serve` for the package, one headless Chromium (Debian's, driven by Playwright) per module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from dashboard_support import CHROMIUM, CHROMIUM_ARGS, DashServer, Deployment, deployment


@pytest.fixture(scope="session")
def dash_deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return deployment(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture(scope="session")
def dash_server(dash_deployment: Deployment) -> Iterator[DashServer]:
    server = DashServer(dash_deployment)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
