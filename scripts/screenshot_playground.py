"""Screenshot the playground page of a running `lorakit serve` at the end of a streamed answer.

The picture in docs/serving.md comes from this script (tests/serve/test_playground.py runs it
too, so it keeps working with the page):

    python scripts/screenshot_playground.py --url http://127.0.0.1:8000 --api-key KEY \\
        --blend sql=0.7 --blend polite=0.5 --prompt "the cat sat" --out docs/images/playground.png

It opens the page in headless Chromium (Debian's `chromium`, driven by Playwright; install it
with `bash .ci/system-deps.sh`), enters the key, chooses the adapter (or sets the blend's
sliders), types the prompt, presses Generate, waits for the stream's end and saves the page.
The last line printed is JSON: the streamed text and the page's status line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

CHROMIUM = "chromium"  # Debian's package, installed by .ci/system-deps.sh
STREAM_TIMEOUT_MS = 120_000
VIEWPORT = {"width": 1000, "height": 720}


def find_chromium() -> str:
    """The chromium executable, or exit naming the command that installs it."""
    found = shutil.which(CHROMIUM)
    if found is None:
        sys.exit("chromium is not installed: run `bash .ci/system-deps.sh` (Debian's chromium)")
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--api-key", default=os.environ.get("LORAKIT_API_KEY"), help="default: $LORAKIT_API_KEY"
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--adapter", default="base", help="one adapter, or base (the default)")
    choice.add_argument("--blend", action="append", metavar="NAME=WEIGHT", help="repeatable")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(args.url.rstrip("/") + "/")
        if args.api_key:
            page.locator("#api-key").fill(args.api_key)
            page.locator("#connect").click()
        page.locator("#workspace").wait_for(state="visible")
        if args.blend:
            page.locator("#mode-blend").check()
            for item in args.blend:
                name, _, weight = item.partition("=")
                page.locator(f'input[data-adapter="{name}"]').fill(weight)
        else:
            page.locator("#model").select_option(args.adapter)
        page.locator("#prompt").fill(args.prompt)
        page.locator("#max-tokens").fill(str(args.max_tokens))
        page.locator("#temperature").fill(str(args.temperature))
        page.locator("#generate").click()
        ended = '#status:is([data-state="done"], [data-state="error"], [data-state="stopped"])'
        page.locator(ended).wait_for(timeout=STREAM_TIMEOUT_MS)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        result = {
            "text": page.locator("#output").text_content(),
            "status": page.locator("#status").text_content(),
            "state": page.locator("#status").get_attribute("data-state"),
        }
        browser.close()
    print(json.dumps(result))
    if result["state"] != "done":
        sys.exit(f"the stream did not end well: {result['status']}")


if __name__ == "__main__":
    main()
