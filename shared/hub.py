"""Which model a `--model` names: a local directory, a Hugging Face repo id, or the demo model.

    resolve_model("~/models/Qwen3-30B-A3B-4bit", home)        the directory, as it is
    resolve_model("mlx-community/Qwen3-30B-A3B-4bit", home)    its snapshot in the Hugging Face cache
    resolve_model("org/name@v1.0", home)                       ... at a branch, tag or commit
    resolve_model(None, home)                                  the demo model, made on first use

A repo id is downloaded once by huggingface_hub into its own cache (HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT are its settings, read by it), with its progress bars
and its resumption of an interrupted transfer. The resolved model is a plain directory: every
command that follows (and every child of `moebus up`) takes that path and never asks the Hub again.
A snapshot directory still says where it came from (`origin`), which a worker uses to fetch only
the weight files of its experts later (shared.shards).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ModelError

# mlx-lm's own download patterns (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS; a test keeps them equal):
# a cache mlx-lm filled serves moebus offline, and the other way round.
ALLOW_PATTERNS = ("*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                  "*.jsonl", "*.jinja")
# Everything but the weights (mlx-lm's tokenizer patterns): a worker fetches its experts' shards later.
SMALL_PATTERNS = tuple(p for p in ALLOW_PATTERNS if p != "model*.safetensors")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Origin:
    """The Hub repo and commit a snapshot directory of the cache holds."""

    repo_id: str
    commit: str
    cache_dir: Path


def resolve_model(spec: str | None, home: Path, *, weights: bool = True) -> Path:
    """The local directory of the model `spec` names (module docstring). `weights=False`
    downloads all but the weight files: config, tokenizer and the shards' index."""
    if not spec:
        from shared.demo import ensure_demo_model
        return ensure_demo_model(home)
    local = Path(spec).expanduser()
    if local.exists():  # an existing directory wins over a repo id of the same spelling
        return local.resolve()
    repo, revision = parse_spec(spec)
    return _snapshot(repo, revision, ALLOW_PATTERNS if weights else SMALL_PATTERNS)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """("org/name", revision or None) from ORG/NAME[@REVISION]; a ModelError for anything else."""
    repo, at, revision = spec.partition("@")
    if spec.startswith((".", "/", "~")) or not _REPO.fullmatch(repo) or "--" in repo or ".." in repo \
            or repo.endswith((".", "-")) or (at and not revision):
        raise ModelError(f"{spec}: no such directory, nor a Hugging Face repo id (ORG/NAME or ORG/NAME@REVISION)")
    return repo, revision or None


def origin(path: Path) -> Origin | None:
    """Repo and commit of a snapshot in the Hugging Face cache (`<cache>/models--ORG--NAME/
    snapshots/<commit>`), from its path alone; None for any other directory."""
    snapshots, storage = path.parent, path.parent.parent
    if snapshots.name != "snapshots" or not storage.name.startswith("models--") or not _COMMIT.fullmatch(path.name):
        return None
    return Origin(storage.name.removeprefix("models--").replace("--", "/"), path.name, storage.parent)


def model_name(path: Path) -> str:
    """The name clients ask for: the repo id of a snapshot (not its commit), else the directory's."""
    found = origin(path)
    return found.repo_id if found is not None else path.name


def fetch_files(path: Path, files: list[str]) -> None:
    """Download the files of a snapshot's repo that its directory lacks, at its commit (no
    repo look-up: a file already here costs nothing)."""
    missing = [f for f in files if not (path / f).is_file()]
    if not missing:
        return
    found = origin(path)
    if found is None:
        raise ModelError(f"{path}: {', '.join(missing)} missing, and the directory is no snapshot of the "
                         "Hugging Face cache to fetch them from")
    from huggingface_hub import hf_hub_download
    with hub_errors(found.repo_id, found.commit):
        for name in missing:
            hf_hub_download(found.repo_id, name, revision=found.commit, cache_dir=found.cache_dir)


def _snapshot(repo: str, revision: str | None, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    with hub_errors(repo, revision):
        try:  # what the cache holds, without a request: whether the download deserves a line
            snapshot_download(repo, revision=revision, allow_patterns=list(patterns), local_files_only=True)
            bars = None
        except LocalEntryNotFoundError:
            bars = _announced(f"{repo}{f'@{revision}' if revision else ''}", "the files mlx-lm reads" if
                              "model*.safetensors" in patterns else "its config and tokenizer; weights as needed")
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns), tqdm_class=bars))
    if not (path / "config.json").is_file():
        raise ModelError(f"{repo}: the repo has no config.json: not a model mlx-lm can load")
    if "model*.safetensors" in patterns and not any(path.glob("model*.safetensors")):
        raise ModelError(f"{repo}: the repo has no model*.safetensors weights, the only ones mlx-lm reads: "
                         "look for an MLX conversion of it (mlx-community/...)")
    return path


def _announced(what: str, files: str) -> type:
    """huggingface_hub's progress bars, which first say in one line what is downloaded: a log,
    where the byte bars are not drawn (no terminal), shows it too."""
    from huggingface_hub import constants
    from huggingface_hub.utils import tqdm

    class Announced(tqdm):
        said = False

        def __init__(self, *args: object, **kwargs: object) -> None:
            if not Announced.said:
                Announced.said = True
                print(f"moebus: downloading {what} from {constants.ENDPOINT} into {constants.HF_HUB_CACHE} ({files})",
                      file=sys.stderr, flush=True)
            super().__init__(*args, **kwargs)

    return Announced


@contextmanager
def hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's errors (several lines each) as one line that says what to do."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    try:
        yield
    except GatedRepoError:
        url = f"{constants.ENDPOINT}/{repo}"
        if get_token() is None:
            raise ModelError(f"{repo} is gated: accept its terms at {url}, then set HF_TOKEN to a token of that "
                             "account (or run `hf auth login`)") from None
        raise ModelError(f"{repo} is gated and the token of HF_TOKEN has no access to it: accept its terms at "
                         f"{url} with that account") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo}: no such model on {constants.ENDPOINT} (a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo}: no revision {revision!r} (a branch, tag or commit of the repo)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError):
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"{constants.ENDPOINT} cannot be reached"
        raise ModelError(f"{repo}{f'@{revision}' if revision else ''} is not (all) in the Hugging Face cache "
                         f"{constants.HF_HUB_CACHE} and {why}: run once with network access to download it") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise ModelError(f"{repo}: {constants.ENDPOINT} answered {status}; try again later") from None
    except HFValidationError as e:
        raise ModelError(f"{repo}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # disk full, read-only cache
        raise ModelError(f"{repo}: cannot download into {constants.HF_HUB_CACHE}: {e.strerror or e}") from None
