"""The standalone HTML picture opens in a real browser, with no server, and shows the rewrite.

``ts.save_html`` writes a page whose tree treescope draws with JavaScript inside a shadow
root, so a string check of the file (``test_viz.py``) cannot tell whether it *renders*.
Here headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) opens the file via
``file://``, driven by Playwright, and the test checks what a reader would see: the
inserted layer's element exists in the rendered DOM with its spec, the full-page
screenshot is not blank, and the inserted layer's violet highlight is on screen.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from requirements import in_ci, require
from torch import nn

import torchsurgeon as ts
from torchsurgeon.viz import styles

pytestmark = pytest.mark.slow

# The flags a sandboxed root user with a closed network needs: no sandbox, no GPU, and none
# of the background connections Chromium otherwise keeps retrying.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_html_page_renders_in_headless_chromium(gpt2_hf: nn.Module, tmp_path: Path) -> None:
    sync_api = require("playwright.sync_api")
    image = require("PIL.Image")
    probe = ts.select(ts.wrap(gpt2_hf)).at("transformer.h.1.mlp").insert_after(ts.layers.Save("x"))
    page_path = ts.save_html(probe, tmp_path / "probe.html")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_path.as_uri())
            # Playwright's CSS locators pierce shadow roots: this is the drawn tree itself.
            inserted = page.locator(f'treescope-container [style*="{styles.INSERTED.marker}"]')
            inserted.first.wait_for(timeout=20_000)
            assert inserted.count() == 1
            spec = inserted.first.inner_text()
            assert "Save(" in spec and "site='transformer.h.1.mlp'" in spec and "name='x'" in spec
            tree_text = page.evaluate(
                "() => document.querySelector('treescope-container').shadowRoot.textContent"
            )
            assert "GPT2LMHeadModel(" in tree_text and "ts_after=" in tree_text

            inserted.first.scroll_into_view_if_needed()
            full = tmp_path / "page.png"
            page.screenshot(path=str(full), full_page=True)
            layer_shot = tmp_path / "inserted.png"
            inserted.first.screenshot(path=str(layer_shot))
        finally:
            browser.close()

    with image.open(full) as shot:
        pixels = torch.tensor(list(shot.convert("L").getdata()), dtype=torch.float32)
        assert shot.height > 900  # the whole tree is drawn, taller than one screen
    assert pixels.std() > 10  # not a blank page: text on a white background
    assert (pixels < 128).float().mean() > 0.005  # and plenty of dark text

    # The layer is drawn on a violet block (blue well above red and green, like every
    # torchsurgeon "inserted" colour): a few hundred such pixels, not a stray edge.
    with image.open(layer_shot) as shot:
        rgb = torch.tensor(list(shot.convert("RGB").getdata()), dtype=torch.float32)
    red, green, blue = rgb.unbind(dim=1)
    violet_pixels = int(((blue - red > 30) & (blue - green > 30) & (blue > 200)).sum())
    assert violet_pixels > 300, f"only {violet_pixels} violet pixels on the inserted layer"
