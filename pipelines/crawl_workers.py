"""img2dataset's crawl with our downloader (`pipelines/fetch.py`) and with workers that end with the pipeline.

`guarded_img2dataset(settings)` makes `img2dataset.download` build `GuardedDownloader` (img2dataset's
`Downloader` with `download_image_with_retry` swapped for `fetch_image` in whichever process runs a
shard: multiprocessing spawn workers and Ray workers unpickle this class, so they import this module)
and `GuardedLoggerProcess` (its stats printer). Both ask for SIGTERM when the pipeline's process dies
(`pipelines.services.processes.follow_parent`): a `kill -9` of the pipeline leaves no crawl process behind.
`light_spawn()` keeps spawned workers from re-importing the pipeline's main module.
This module imports img2dataset; `pipelines.crawl` imports it only when it crawls.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from dataclasses import replace
from functools import partial
from typing import Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home

from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.logger import LoggerProcess  # noqa: E402

from pipelines.services.processes import follow_parent  # noqa: E402
from pipelines.fetch import FetchSettings, fetch  # noqa: E402
from pipelines.url_policy import FetchError  # noqa: E402


def fetch_image(row, timeout, retries, user_agent_token, disallowed_header_directives, settings: FetchSettings):
    """`img2dataset.downloader.download_image_with_retry`'s contract: (key, stream or None, error or None)."""
    key, url = row
    if disallowed_header_directives:  # the caller's X-Robots-Tag policy, as img2dataset applies it
        settings = replace(settings, disallowed_header_directives=frozenset(disallowed_header_directives),
                           user_agent_token=user_agent_token)
    try:
        return key, io.BytesIO(fetch(url, settings)), None
    except FetchError as err:
        return key, None, str(err)


class GuardedDownloader:
    """Built in place of img2dataset's Downloader (same arguments) plus the fetch settings; picklable."""

    def __init__(self, *args, fetch_settings: FetchSettings, **kwargs):
        self.downloader, self.settings = Downloader(*args, **kwargs), fetch_settings

    def __call__(self, row):
        import img2dataset.downloader as module

        follow_parent()  # a crawl worker ends with the pipeline, also when the pipeline is killed
        module.download_image_with_retry = partial(fetch_image, settings=self.settings)
        return self.downloader(row)


class GuardedLoggerProcess(LoggerProcess):
    """img2dataset's stats printer, which otherwise loops forever once its parent is killed."""

    def run(self):
        follow_parent()
        return super().run()


@contextlib.contextmanager
def guarded_img2dataset(settings: FetchSettings) -> Iterator[None]:
    """While open, `img2dataset.download` builds our downloader and logger (restored after, also on error)."""
    main = importlib.import_module("img2dataset.main")  # the module: the package's `main` attribute is a function
    original = main.Downloader, main.LoggerProcess
    main.Downloader, main.LoggerProcess = partial(GuardedDownloader, fetch_settings=settings), GuardedLoggerProcess
    try:
        yield
    finally:
        main.Downloader, main.LoggerProcess = original


@contextlib.contextmanager
def light_spawn() -> Iterator[None]:
    """While open, processes started by multiprocessing's spawn do not import the parent's `__main__` module.

    img2dataset's multiprocessing distributor spawns its workers, and again every 5 shards
    (`maxtasksperchild`); each spawned process first re-imports the caller's main module, which for
    `pipelines/build_instruct_beam.py` means Apache Beam and every stage. Nothing a crawl worker runs
    is defined there (it unpickles `GuardedDownloader` from this module), so it is told there is none,
    as in an interactive session. Restored after, also on error."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None  # multiprocessing.spawn.get_preparation_data reads these two at each start
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
