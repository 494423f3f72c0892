"""Pretrained weights the way torchvision and pytorch-fid get them: a file in torch's hub cache
(`torch.hub.get_dir()/checkpoints/<the URL's file name>`), downloaded on first use with
`torch.hub.download_url_to_file`, its SHA-256 checked against the hash prefix in the file name
(`name-<hex>.pth`, what `load_state_dict_from_url(check_hash=True)` checks). The file lands where
their own loaders look, so `python -m pytorch_fid` and torchvision's `weights=` find it too."""

from __future__ import annotations

import http.client
import logging
import os
import sys
from urllib.parse import urlparse

log = logging.getLogger(__name__)


class DownloadError(FileNotFoundError):
    """The file is not cached and could not be downloaded (offline, refused, not found)."""


def cache_path(url: str) -> str:
    """Where torch's hub cache keeps the file of `url`."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def cached_or_download(url: str, what: str) -> str:
    """The local path of `url`'s file in torch's hub cache, downloaded first when missing.

    Raises DownloadError (a FileNotFoundError) when it cannot be fetched, and ValueError when the
    download's SHA-256 does not start with the hash prefix in its file name (nothing is kept then)."""
    import torch

    path = cache_path(url)
    if os.path.exists(path):
        return path
    found = torch.hub.HASH_REGEX.search(os.path.basename(path))
    prefix = found.group(1) if found else None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log.info("downloading %s from %s to %s", what, url, path)
    try:
        # writes a temporary file beside `path` and moves it there only when the hash matches
        torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=sys.stderr.isatty())
    except (OSError, http.client.HTTPException) as e:  # URLError/HTTPError are OSErrors
        raise DownloadError(f"{what} not in torch's cache ({path}) and downloading {url} failed "
                            f"({type(e).__name__}: {e})") from None
    except RuntimeError as e:  # torch: 'invalid hash value (expected "...", got "...")'
        raise ValueError(f"{url}: the download does not match the hash in its name, not kept ({e})") from None
    return path
