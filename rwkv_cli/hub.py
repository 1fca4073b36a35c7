"""Model specs: from what the user types after `-m` to a checkpoint file on disk.

A spec is, in the order it is tried:

* a local checkpoint file, or a directory holding exactly one `*.pth` / `*.safetensors` file. The
  filesystem is checked first, so `models/x.pth` is never taken for a Hub repository;
* an alias of an official model (`rwkv7-g1-0.4b`, see `ALIASES`): a repository plus a file-name
  pattern. BlinkDL renames files with every release (`rwkv7-g1-0.4b-20250324-ctx4096.pth`, then
  `rwkv7-g1a-...`), so the pattern is matched against the repository's file list at run time and
  the newest file wins, by the date in its name;
* `owner/repo` (the repository's one checkpoint; an error lists them when there are several) or
  `owner/repo:FILE`, where FILE may be a glob (`owner/repo:*-0.4b-*`; several matches resolve to
  the newest by date, or an error lists them);
* `owner/repo` of a Hugging Face-layout repository (`RWKV/rwkv-4-169m-pile`, `fla-hub/rwkv7-0.1B-g1`:
  `model.safetensors`, shards listed by `model.safetensors.index.json`, or `pytorch_model.bin`, and
  no BlinkDL checkpoint beside them): the weights, `config.json` and the tokenizer files are fetched
  into one snapshot folder, and the spec resolves to the weights (or shard index) inside it, as a
  local model folder does;
* any Hub spec may end in `@REVISION` (a branch, tag or commit).

Default model: `rwkv7-g1-0.4b`, unless `RWKV_MODEL` names another spec. G1 is BlinkDL's current
chat and reasoning line, so the default answers `rwkv chat` sensibly. 0.4B (24 layers, width
1024) is a ~0.9 GB download and ~1.8 GB of RAM in fp32, and CPU decoding reads every weight once
per token, so it stays interactive without a GPU; 1.5B is a 3 GB download, ~6 GB of RAM and ~3.5x
the bytes read per token; 0.1B is a demo size.

Downloads go through `huggingface_hub.hf_hub_download` into the standard cache, with its progress
bars. It writes to a process-unique `*.incomplete` file next to the blob and only moves it into
place (and links it into `snapshots/`) once complete, deleting the partial file on failure, so an
interrupted download never leaves a file that a later run would load. This module writes nothing
itself. `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN` are read when a spec is
resolved (huggingface_hub reads some of them once, at import), and `offline=True` forces
cache-only. Without network, Hub specs resolve against the cache, so a model pulled once keeps
working offline.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from .checkpoint import HF_WEIGHT_FILES
from .errors import RWKVError

CHECKPOINT_SUFFIXES = (".pth", ".safetensors")
DEFAULT_MODEL = "rwkv7-g1-0.4b"
MODEL_HELP = (
    "A checkpoint file or directory, owner/repo[:FILE_OR_GLOB][@REVISION] on the Hugging Face Hub, "
    f"or an alias (rwkv7-g1-0.4b, rwkv7-world-0.1b, ...). Default: $RWKV_MODEL or {DEFAULT_MODEL}."
)


class ModelNotFoundError(RWKVError):
    """A model spec that names nothing usable: unknown, ambiguous, not downloadable, not cached."""


# alias -> (repo, glob over its file names); the newest match by date wins. `rwkv7-g1*` takes
# every G1 generation (g1, g1a, g1b, ...) and leaves out the DeepEmbed `rwkv7a-`/`rwkv7b-` files,
# which are other architectures; `-2*` after the size keeps RWKV-4 to the dated release files.
ALIASES: dict[str, tuple[str, str]] = {
    **{
        f"rwkv7-g1-{s}": ("BlinkDL/rwkv7-g1", f"rwkv7-g1*-{s}-*.pth")
        for s in ("0.1b", "0.4b", "1.5b", "2.9b")
    },
    **{
        f"rwkv7-world-{s.lower()}": ("BlinkDL/rwkv-7-world", f"RWKV-x070-World-{s}-v*.pth")
        for s in ("0.1B", "0.4B", "1.5B", "2.9B")
    },
    "rwkv4-pile-169m": ("BlinkDL/rwkv-4-pile-169m", "RWKV-4-Pile-169M-2*.pth"),
}


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    pattern: str | None  # a file name or glob inside the repo; None: the repo's one checkpoint
    revision: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on disk and where it came from (repo fields are None for local files)."""

    path: Path  # for Hub files, the path inside `snapshots/<commit>/`, symlink not followed
    spec: str
    repo_id: str | None = None
    filename: str | None = None  # path inside the repo
    revision: str | None = None  # commit hash

    @property
    def directory(self) -> Path:
        """Where files that travel with the checkpoint (tokenizer.json) are looked for."""
        return self.path.parent

    @property
    def source(self) -> str:
        if self.repo_id is None:
            return str(self.path)
        return f"{self.repo_id}:{self.filename}" + (f"@{self.revision[:12]}" if self.revision else "")

    @property
    def exact_spec(self) -> str:
        """A spec that resolves to this very file later, from any folder: the absolute path of a
        local file, or repo:file@commit (the whole hash: offline lookups need it)."""
        if self.repo_id is None:
            return os.path.abspath(self.path)
        return f"{self.repo_id}:{self.filename}" + (f"@{self.revision}" if self.revision else "")


def resolve_model_option(
    spec: str | None, offline: bool = False, revision: str | None = None
) -> ResolvedModel:
    """What `-m/--model`, `--offline` and `--revision` of any command resolve to (empty = unset)."""
    return resolve_model(spec or None, revision=revision or None, offline=offline)


def resolve_model(
    spec: str | None = None,
    *,
    revision: str | None = None,
    offline: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Resolve a spec (None: `$RWKV_MODEL` or the default) to a local file, downloading if needed."""
    text = (spec or os.environ.get("RWKV_MODEL") or DEFAULT_MODEL).strip()
    local = Path(text).expanduser()
    if local.exists():
        if revision:
            raise ModelNotFoundError(f"{text} is a local path; a revision applies only to Hub models")
        return ResolvedModel(_local_checkpoint(local), text)
    hub = parse_spec(text)
    if revision and hub.revision and revision != hub.revision:
        raise ModelNotFoundError(f"{text} names revision {hub.revision} but --revision says {revision}")
    hub = replace(hub, revision=hub.revision or revision)
    cache = Path(cache_dir) if cache_dir else hub_cache_dir()
    return _resolve_hub(hub, text, offline or env_offline(), cache, progress)


def parse_spec(text: str) -> HubSpec:
    """An alias or `owner/repo[:FILE][@REVISION]`; local paths must have been ruled out before."""
    base, revision = text, None
    if "@" in text:
        base, _, revision = text.rpartition("@")
        if not base or not revision:
            raise ModelNotFoundError(f"{text}: expected SPEC@REVISION")
    if base in ALIASES:
        return HubSpec(*ALIASES[base], revision)
    repo_id, colon, pattern = base.partition(":")
    if colon and not pattern:
        raise ModelNotFoundError(f"{text}: expected a file name or glob after ':'")
    if not _REPO_ID.match(repo_id) or repo_id.endswith(CHECKPOINT_SUFFIXES) or ".." in repo_id:
        if repo_id.endswith(CHECKPOINT_SUFFIXES) or text.startswith(("/", ".", "~")):
            raise ModelNotFoundError(f"{text}: no such file or directory")
        raise ModelNotFoundError(
            f"{text!r} is not a file, a directory, owner/repo[:FILE] or a known alias ({', '.join(ALIASES)})"
        )
    return HubSpec(repo_id, pattern or None, revision)


# Hugging Face layout: the weights' entry points are checkpoint.HF_WEIGHT_FILES (in the order a
# model folder is read); shards, and the small files fetched with the weights.
_HF_SHARD = re.compile(r"^(model-\d+-of-\d+\.safetensors|pytorch_model-\d+-of-\d+\.bin)$")
HF_COMPANIONS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_DATE = re.compile(r"(?<!\d)(20\d{6})(?!\d)")  # YYYYMMDD in BlinkDL file names
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    """The Hub cache as the environment says now: HF_HUB_CACHE, else HF_HOME/hub, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def env_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _local_checkpoint(path: Path) -> Path:
    if not path.is_dir():
        return path  # any file: the checkpoint reader says what it is if it is not a checkpoint
    if (path / "config.json").is_file():  # a Hugging Face model folder (transformers, fla-hub, RWKV-org)
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name  # the weights, or the index of their shards
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(f"{path}: no .pth or .safetensors file in this directory")
    raise ModelNotFoundError(
        f"{path} holds {len(found)} checkpoints; pass one of: {_names(p.name for p in found)}"
    )


# ------------------------------------------------------------------------------------ the Hub


def _resolve_hub(spec: HubSpec, text: str, offline: bool, cache: Path, progress: bool) -> ResolvedModel:
    files, why_cached = None, "offline" if offline else ""
    if not offline:
        try:
            files = _remote_files(spec)
        except Exception as e:  # noqa: BLE001  sorted out by _unreachable / _explain
            if not _unreachable(e):
                raise ModelNotFoundError(_explain(e, spec, spec.pattern or "the file list")) from None
            why_cached = f"cannot reach the Hub ({_first_line(e)})"
    if files is None:
        files = _cached_files(spec, cache)
    cache_only = offline or bool(why_cached)
    entry = _hf_entry(spec, [name for name, _ in files])
    if entry is not None:
        return _resolve_hf_layout(spec, text, files, entry, cache_only, cache, progress)
    filename, commit = _choose(spec, text, files, why_cached, cache)
    # A new download asks for the branch or tag by name, so huggingface_hub records refs/<name>
    # for later offline runs; the commit is then read from the path it returns. A file already
    # cached at the listed commit is taken by commit: no HEAD request.
    pinned = cache_only or (_repo_dir(cache, spec) / "snapshots" / commit / filename).is_file()
    path = _download(
        spec, filename, commit if pinned else spec.revision or "main", cache, cache_only, progress
    )
    commit = path.parts[-1 - len(PurePosixPath(filename).parts)]
    beside = str(PurePosixPath(filename).parent / "tokenizer.json").removeprefix("./")
    if beside in dict(files):  # a tokenizer that ships with the model, at the same commit
        _download(spec, beside, commit, cache, cache_only, progress)
    return ResolvedModel(path, text, spec.repo_id, filename, commit)


def _hf_entry(spec: HubSpec, names: list[str]) -> str | None:
    """For `owner/repo` alone: the Hugging Face weights' entry point (`HF_WEIGHT_FILES`) when the repo
    has one and no BlinkDL checkpoint (a .pth / .safetensors that is not HF weights), else None."""
    if spec.pattern is not None:
        return None
    blinkdl = [n for n in _matches(spec, names) if n not in HF_WEIGHT_FILES and not _HF_SHARD.match(n)]
    if blinkdl:
        return None
    return next((n for n in HF_WEIGHT_FILES if n in names), None)


def _resolve_hf_layout(
    spec: HubSpec, text: str, files: list[tuple[str, str]], entry: str, cache_only: bool, cache: Path,
    progress: bool,
) -> ResolvedModel:
    """Fetch a Hugging Face-layout repo's weights (every shard an index lists), `config.json` and
    tokenizer files into one snapshot folder; resolve to the weights' entry point inside it."""
    listed = dict(files)
    pinned = cache_only or (_repo_dir(cache, spec) / "snapshots" / listed[entry] / entry).is_file()
    revision = listed[entry] if pinned else spec.revision or "main"  # as for one file: refs/<name> recorded
    path = _download(spec, entry, revision, cache, cache_only, progress)
    commit = path.parent.name  # every entry of HF_WEIGHT_FILES sits at the repo's root
    names = [name for name in HF_COMPANIONS if listed.get(name) == listed[entry]]  # same snapshot
    if entry.endswith(".index.json"):
        names = _shards(spec, entry, path) + names
    for name in names:
        _download(spec, name, commit, cache, cache_only, progress)
    return ResolvedModel(path, text, spec.repo_id, entry, commit)


def hf_shard_names(index: Path) -> list[str]:
    """The repo paths of the shards a cached `*.index.json` lists, in order ("/" stands for one
    outside the snapshot). Raises CheckpointError when the index cannot be read."""
    from .checkpoint import weight_files

    try:
        return [p.relative_to(index.parent).as_posix() for p in weight_files(index)]
    except ValueError:  # an absolute path
        return ["/"]


def _shards(spec: HubSpec, entry: str, index: Path) -> list[str]:
    """The files a `*.index.json` shard index lists (its `weight_map` values), in order."""
    from .errors import CheckpointError

    try:
        names = [PurePosixPath(n) for n in hf_shard_names(index)]
    except CheckpointError as e:
        raise ModelNotFoundError(f"{spec.repo_id}:{entry}: {str(e).removeprefix(f'{index}: ')}") from None
    bad = [str(n) for n in names if n.is_absolute() or ".." in n.parts]
    if bad:
        raise ModelNotFoundError(f"{spec.repo_id}:{entry} lists a shard outside the repository: {bad[0]}")
    return [str(n) for n in names]


def _remote_files(spec: HubSpec) -> list[tuple[str, str]]:
    """(file, commit) for every file of the repo at the revision, from the Hub API."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(spec.repo_id, revision=spec.revision)
    return [(s.rfilename, info.sha) for s in info.siblings or []]


def _cached_files(spec: HubSpec, cache: Path) -> list[tuple[str, str]]:
    """(file, commit) for the cached files of the repo at the revision; with no revision, main's
    snapshot if the spec finds something there, else every snapshot (a file cached at an older
    commit stays usable offline; a name seen twice keeps the first, main's or the newest)."""
    repo = _repo_dir(cache, spec)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return []
    ref = _read_ref(repo, spec.revision or "main")
    if spec.revision:
        return _snapshot(snapshots, spec.revision if _COMMIT.match(spec.revision) else ref)
    main = _snapshot(snapshots, ref)
    if _matches(spec, [name for name, _ in main]) or _hf_entry(spec, [name for name, _ in main]):
        return main
    rest = sorted((d for d in snapshots.iterdir() if d.name != ref), key=lambda d: -d.stat().st_mtime)
    found: dict[str, str] = {}
    for name, commit in main + [f for d in rest for f in _snapshot(snapshots, d.name)]:
        found.setdefault(name, commit)
    return list(found.items())


def _repo_dir(cache: Path, spec: HubSpec) -> Path:
    return cache / ("models--" + spec.repo_id.replace("/", "--"))  # the cache's layout for model repos


def _snapshot(snapshots: Path, commit: str | None) -> list[tuple[str, str]]:
    root = snapshots / commit if commit else None
    if root is None or not root.is_dir():
        return []
    # is_file() follows the symlink: a snapshot entry whose blob is gone does not count
    return [(p.relative_to(root).as_posix(), commit) for p in sorted(root.rglob("*")) if p.is_file()]


def _read_ref(repo: Path, ref: str) -> str | None:
    try:
        return (repo / "refs" / ref).read_text().strip() or None
    except OSError:
        return None


def _matches(spec: HubSpec, names: list[str]) -> list[str]:
    """The names the spec's file part selects: an exact name (any file), else checkpoints only."""
    ckpts = [n for n in names if n.endswith(CHECKPOINT_SUFFIXES)]
    if spec.pattern is None:
        return ckpts
    if not any(c in spec.pattern for c in "*?["):
        return [n for n in names if spec.pattern in (n, PurePosixPath(n).name)]
    glob = spec.pattern
    return [n for n in ckpts if fnmatchcase(n, glob) or fnmatchcase(PurePosixPath(n).name, glob)]


def _choose(
    spec: HubSpec, text: str, files: list[tuple[str, str]], why_cached: str, cache: Path
) -> tuple[str, str]:
    """The one file the spec means, or an error that lists the candidates."""
    commits = dict(files)
    found = _matches(spec, list(commits))
    where = f"{spec.repo_id}" + (f"@{spec.revision}" if spec.revision else "")
    if len(found) > 1:
        newest = _newest(found) if spec.pattern else None  # owner/repo alone must be unambiguous
        if newest is None:
            many = (
                f"{spec.pattern} matches {len(found)} files in {where}, not all dated" if spec.pattern else ""
            )
            many = many or f"{where} holds {len(found)} checkpoints"
            how = "name one" if spec.pattern else f"pick one with {spec.repo_id}:FILE (a glob works)"
            raise ModelNotFoundError(f"{many}; {how}: {_names(found)}")
        found = [newest]
    if found:
        return found[0], commits[found[0]]
    what = spec.pattern or "checkpoint (.pth or .safetensors)"
    ckpts = _matches(replace(spec, pattern=None), list(commits))
    if why_cached:
        cached = f"; cached there: {_names(ckpts)}" if ckpts else ""
        raise ModelNotFoundError(
            f"{why_cached} and {where} has no {what} in the cache ({cache}){cached}; "
            f"run `rwkv pull {text}` with network, or pass a local file"
        )
    listing = f"; checkpoints there: {_names(ckpts)}" if ckpts else ""
    raise ModelNotFoundError(f"{text}: {where} has no {what}{listing}")


def _newest(names: list[str]) -> str | None:
    """The name with the latest YYYYMMDD date (ties: the last name in sort order); None if some
    name carries no date, since then "newest" means nothing."""
    dated = [(m.group(1), n) for n in names if (m := _DATE.search(PurePosixPath(n).name))]
    return max(dated)[1] if len(dated) == len(names) else None


def _download(
    spec: HubSpec, filename: str, revision: str, cache: Path, offline: bool, progress: bool
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        return Path(
            hf_hub_download(
                spec.repo_id, filename, revision=revision, cache_dir=cache, local_files_only=offline
            )
        )
    except Exception as e:  # noqa: BLE001  every failure becomes one line that says what to do
        if offline:
            raise ModelNotFoundError(
                f"offline and {spec.repo_id}:{filename} is not in the cache ({cache}); "
                "run `rwkv pull` for it with network, or pass a local file"
            ) from None
        raise ModelNotFoundError(_explain(e, spec, filename, cache)) from None
    finally:
        if quiet:
            enable_progress_bars()


def _unreachable(e: Exception) -> bool:
    """True when the Hub could not be asked (network, proxy, offline mode, server down), as opposed
    to the Hub answering no (404, 401/403): only then is the cache a fair substitute."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        return _status(e) is None or _status(e) >= 500
    return not isinstance(e, ValueError)  # e.g. an invalid repo id: the cache would not help


def _status(e: Exception) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def _explain(e: Exception, spec: HubSpec, what: str, cache: Path | None = None) -> str:
    from huggingface_hub import errors

    repo, url = spec.repo_id, f"https://huggingface.co/{spec.repo_id}"
    if isinstance(e, errors.GatedRepoError):
        return f"{repo} is gated: accept its conditions at {url}, then set HF_TOKEN (or run `hf auth login`)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (
            f"{repo}: no such model on the Hub, or it is private (set HF_TOKEN to a token that can read it)"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{repo} has no revision {spec.revision!r}"
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return f"{repo} has no file {what} (see {url}/tree/main)"
    if isinstance(e, errors.HfHubHTTPError) and _status(e) in (401, 403):
        return (
            f"the Hub refused access to {repo} (HTTP {_status(e)}): set HF_TOKEN to a token that can read it"
        )
    if isinstance(e, errors.HfHubHTTPError):
        return f"the Hub answered HTTP {_status(e)} for {repo}:{what}; try again later"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (
            f"disk full while downloading {repo}:{what} into {cache}; free some space or point "
            "HF_HOME at a larger disk (nothing partial was kept)"
        )
    if isinstance(e, PermissionError):
        return f"cannot write to the Hugging Face cache {cache}: set HF_HOME to a writable folder"
    if isinstance(e, errors.LocalEntryNotFoundError) and e.__cause__ is not None:
        e = e.__cause__  # huggingface_hub's "check your connection" wraps the real network error
    return (
        f"cannot download {repo}:{what} ({_first_line(e)}); check the network or proxy, or pass a local file"
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _names(names, limit: int = 8) -> str:
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CachedFile:
    """One file of a model repo in the Hub cache, at one commit."""

    repo_id: str
    filename: str  # path inside the repo
    commit: str
    refs: tuple[str, ...]  # branches and tags pointing at the commit
    path: Path  # in snapshots/<commit>/
    size: int


def cached_files(cache_dir: str | Path | None = None) -> list[CachedFile]:
    """Every file of every model repo in the cache (`scan_cache_dir`), sorted by repo and name."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(Path(cache_dir) if cache_dir else hub_cache_dir())
    except CacheNotFound:
        return []
    out = [
        CachedFile(
            repo.repo_id,
            f.file_path.relative_to(rev.snapshot_path).as_posix(),
            rev.commit_hash,
            tuple(sorted(rev.refs)),
            f.file_path,
            f.size_on_disk,
        )
        for repo in info.repos
        if repo.repo_type == "model"
        for rev in repo.revisions
        for f in rev.files
    ]
    return sorted(out, key=lambda c: (c.repo_id.lower(), c.filename, c.commit))


def find_cached(
    spec: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> list[CachedFile]:
    """The cached files a spec names, for `rwkv rm`: `owner/repo` means every file of the repo;
    a file, glob or alias means every cached revision of every matching file (not only the newest)."""
    if not spec.strip():
        raise ModelNotFoundError("no model named: give owner/repo[:FILE] or an alias")
    if Path(spec).expanduser().exists():
        raise ModelNotFoundError(
            f"{spec} is a local path; `rwkv rm` deletes only models in the Hugging Face cache "
            "(owner/repo[:FILE] or an alias)"
        )
    hub = parse_spec(spec)
    rev = hub.revision or revision
    files = [
        c
        for c in cached_files(cache_dir)
        if c.repo_id == hub.repo_id and (not rev or rev == c.commit or rev in c.refs)
    ]
    keep = set(_matches(hub, [c.filename for c in files])) if hub.pattern else None
    return [c for c in files if keep is None or c.filename in keep]


def delete_cached(files: list[CachedFile], cache_dir: str | Path | None = None) -> int:
    """Delete cached files through huggingface_hub's own strategies; returns the bytes freed.

    A revision losing all its files goes whole (`delete_revisions`: snapshot, refs, blobs, and the
    repo folder once empty); otherwise single files go (`delete_files`), and a blob goes only when
    no other file still points at it.
    """
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(Path(cache_dir) if cache_dir else hub_cache_dir())
    doomed = {c.path for c in files}
    whole, single = [], []
    for repo in info.repos:
        for rev in repo.revisions:
            hit = [f for f in rev.files if f.file_path in doomed]
            if hit and len(hit) == len(rev.files):
                whole.append(rev.commit_hash)
            else:
                single += hit
    strategies = [info.delete_revisions(*whole)] if whole else []
    freed = 0
    if single and hasattr(info, "delete_files"):  # huggingface_hub >= 2.0
        strategies.append(info.delete_files(*single))
    elif single:
        freed = _delete_files_by_hand(info, single)
    for strategy in strategies:
        strategy.execute()
    return freed + sum(s.expected_freed_size for s in strategies)


def _delete_files_by_hand(info, files) -> int:
    """Older huggingface_hub: unlink the snapshot entries, and each blob no other entry uses."""
    doomed = {f.file_path for f in files}
    in_use = {
        f.blob_path for repo in info.repos for rev in repo.revisions for f in rev.files if f.file_path not in doomed
    }
    freed = 0
    for f in files:
        f.file_path.unlink(missing_ok=True)
        if f.blob_path not in in_use and f.blob_path.exists():
            freed += f.size_on_disk
            f.blob_path.unlink()
    return freed
