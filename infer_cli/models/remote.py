"""GGUF headers of files in a hub repo, read through HTTP range requests.

A header is usually well under a megabyte, while the file behind it may be tens of gigabytes, so
``read_remote`` fetches growing prefixes of the file and parses each with the same hostile-input
reader as local files (``gguf_info.parse_header``) until the header is complete. Nothing is
downloaded whole and nothing is written to the cache.
"""

from __future__ import annotations

from dataclasses import replace

from huggingface_hub import hf_hub_url

from infer_cli import paths
from infer_cli.errors import BadModelFile, DownloadFailed
from infer_cli.models import gguf_info, hub
from infer_cli.models.gguf_info import GGUFInfo

FIRST_BYTES = 1 << 20  # the first request; most headers fit
MAX_BYTES = 64 << 20  # a 262k-token vocabulary with merges stays well below this


class _Prefix:
    """A read-only file over the first bytes of a remote file: reads past them return nothing,
    which the GGUF reader reports as truncation at ``len(data)``."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def read_remote(repo_id: str, filename: str, size: int, *, revision: str = "main",
                first: int = FIRST_BYTES, limit: int = MAX_BYTES) -> GGUFInfo:
    """The GGUFInfo of ``filename`` (``size`` bytes) in a hub repo, from range requests of
    growing prefixes: ``first`` bytes, then four times as many each time, up to ``limit``.

    Raises BadModelFile when the header is bad, or still incomplete at ``limit`` bytes, and
    DownloadFailed when the Hub answers a request with an error."""
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=paths.hf_endpoint())
    headers = hub.auth_headers()
    name = f"{repo_id}/{filename}"
    data = b""
    want = first
    # huggingface_hub's own HTTP stack (httpx2 or httpx), as hub uses for downloads
    with hub.httpx.Client(follow_redirects=True, timeout=30) as client:
        while True:
            if len(data) < want:
                r = client.get(url, headers={**headers, "Range": f"bytes={len(data)}-{want - 1}"})
                if r.status_code not in (200, 206):
                    raise DownloadFailed(name, f"the Hub answered HTTP {r.status_code}")
                # A 200 is the whole file from byte 0: keep the part the range asked for.
                chunk = r.content if r.status_code == 206 else r.content[len(data):want]
                data += chunk[: want - len(data)]
            try:
                return gguf_info.parse_header(_Prefix(data), size, name)
            except BadModelFile as e:
                # Only running out of the fetched prefix is worth a longer one; a header that
                # is wrong within the bytes we have stays wrong however many more we fetch.
                ran_out = e.truncated and e.at is not None and e.at < size
                if not ran_out or len(data) >= size or want >= limit:
                    raise
                want = min(want * 4, limit, size)


def repo_infos(repo_id: str, *, revision: str | None = None) -> list[tuple[str, GGUFInfo]]:
    """(quant label, GGUFInfo) for each model GGUF of a hub repo, headers only. A split GGUF is
    one entry: metadata from its first shard, the tensors and sizes of all of them. Projector
    and imatrix files, and splits with shards missing from the repo, are left out.

    Raises what ``hub.list_repo_files`` and ``read_remote`` raise."""
    rev = revision or hub.DEFAULT_REVISION
    commit, files = hub.list_repo_files(repo_id, rev)
    out = []
    for unit in hub.gguf_units(files):
        if unit.aux or unit.missing:
            continue
        infos = [read_remote(repo_id, f.filename, f.size or 0, revision=commit or rev)
                 for f in unit.files]
        info = infos[0]
        if len(infos) > 1:
            info = replace(info, tensors=[t for i in infos for t in i.tensors],
                           file_size=sum(i.file_size for i in infos))
        out.append((unit.label or unit.name, info))
    return out
