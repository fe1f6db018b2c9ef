"""`paretoq-export push OUTPUT_DIR --repo-id USER/NAME`: upload an export folder, with its model card, to the Hub.

huggingface_hub does the transfer: ``create_repo(exist_ok=True)`` then ``upload_folder``, which asks the Hub how to
store each file (``/preupload``) and sends large and binary files through the large-file path (Xet storage when
``hf_xet`` is installed, else the Git LFS batch API with its basic transfer), small text files inline in the commit.
README.md is generated first (paretoq_export.model_card) when the folder has none. Leftovers of interrupted writes
(``*.partial-*``, ``*.tmp``), caches and training state (``*.train/``, ``trainer_state.pt``) are never uploaded.

``--dry-run`` lists what would be uploaded (path in the repo, size, LFS or regular) without a token or a network
call; the upload mode is predicted with the Hub's rules, which the Hub applies for real at upload time. The token
(``HF_TOKEN`` or ``hf auth login``) is handed to huggingface_hub only: it is never printed, logged or written.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

# Files that are never part of a model repo: interrupted atomic writes (the checkpoint, GGUF, ONNX, ExecuTorch and
# card writers all use ".<name>.partial-*" / ".<name>.old-*" siblings), caches, resumable training state.
# fnmatch patterns on the path relative to the folder ("*" also matches "/"), as huggingface_hub applies them.
IGNORE_PATTERNS = [
    "*.tmp", "*.partial", "*.partial-*", "*.old-*", "*.lock", "*.incomplete",
    ".cache/*", "*/.cache/*", "__pycache__/*", "*/__pycache__/*",
    "*.train/*", "trainer_state.pt", "*/trainer_state.pt", "*.pyc",
]
# The Hub stores a file in LFS (Xet) when it is binary, larger than 10 MB, or matches the .gitattributes every new
# model repo starts with (listed here); everything else is committed as a regular git blob.
HUB_LFS_MIN_BYTES = 10_000_000
HUB_LFS_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
    "*.zip", "*.zst", "*tfevents*",
]
SAMPLE_BYTES = 512  # what huggingface_hub sends the Hub to judge text vs binary
NO_TOKEN_MESSAGE = ("no Hugging Face token is configured: run `hf auth login` (or set HF_TOKEN to a token with write "
                    "access), or use --dry-run to see what would be uploaded")


class HubError(ValueError):
    """A push the user can fix; the message is one line naming the problem and the fix (never the token)."""


@dataclass
class UploadEntry:
    path_in_repo: str
    size: int
    mode: str  # "lfs" | "regular": how the Hub stores it (predicted before the upload)
    generated: bool = False  # README.md written by this push


@dataclass
class UploadPlan:
    folder: Path
    files: list[UploadEntry]
    ignored: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    repo_id: str
    plan: UploadPlan
    dry_run: bool
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    card_written: bool = False


def hub_upload_mode(path_in_repo: str, size: int, sample: bytes) -> str:
    """How the Hub stores a file: "lfs" for binary content, more than 10 MB or an LFS-tracked name, else
    "regular". huggingface_hub commits empty files as regular whatever the Hub says."""
    if size == 0:
        return "regular"
    if size > HUB_LFS_MIN_BYTES or b"\0" in sample:
        return "lfs"
    name = path_in_repo.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatch(path_in_repo, p) or fnmatch.fnmatch(name, p) for p in HUB_LFS_PATTERNS):
        return "lfs"
    return "regular"


def plan_upload(folder: str | os.PathLike, card_text: str | None = None) -> UploadPlan:
    """Every file upload_folder would send from ``folder`` (its own filter: IGNORE_PATTERNS plus huggingface_hub's
    defaults), with size and upload mode. ``card_text``: a README.md that will be generated before the upload."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(folder)
    every = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    kept = list(filter_repo_objects(every, ignore_patterns=IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS)))
    files = []
    for rel in kept:
        path = folder / rel
        with open(path, "rb") as fh:
            sample = fh.read(SAMPLE_BYTES)
        size = path.stat().st_size
        files.append(UploadEntry(rel, size, hub_upload_mode(rel, size, sample)))
    if card_text is not None and "README.md" not in kept:
        data = card_text.encode("utf-8")
        files.append(UploadEntry("README.md", len(data), hub_upload_mode("README.md", len(data), data[:SAMPLE_BYTES]),
                                 generated=True))
        files.sort(key=lambda f: f.path_in_repo)
    return UploadPlan(folder, files, sorted(set(every) - set(kept)))


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"--repo-id {repo_id!r} is not a valid repo id ({' '.join(str(exc).split())[:160]}): "
                       "use USER/NAME or ORG/NAME") from None
    if "/" not in repo_id:
        raise HubError(f"--repo-id {repo_id!r} has no namespace: use USER/NAME or ORG/NAME")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> PushResult:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing), generating README.md first when the
    folder has none. ``dry_run``: plan only (no token, no network, nothing written). ``token`` None: the configured
    one (HF_TOKEN or `hf auth login`); ``endpoint`` None: huggingface_hub's (HF_ENDPOINT)."""
    from paretoq_export import model_card

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"folder {folder} does not exist: give the output folder of an export")
    _check_repo_id(repo_id)
    card_missing = not (folder / model_card.CARD_FILE).is_file()
    if not dry_run:
        from huggingface_hub import get_token

        token = token or get_token()
        if not token:
            raise HubError(NO_TOKEN_MESSAGE)
    card_text = None
    if card_missing:
        card_text = model_card.build_model_card(folder, checkpoint, base_model, license, repo_id=repo_id).text
    plan = plan_upload(folder, card_text)
    if not plan.files:
        raise HubError(f"{folder} has nothing to upload (every file is ignored): export the model there first")
    result = PushResult(repo_id, plan, dry_run)
    if dry_run:
        return result

    if card_text is not None:
        model_card.write_text_atomic(folder / model_card.CARD_FILE, card_text)
        result.card_written = True
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with paretoq-export",
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        first = " ".join(str(exc).split())[:300]
        fix = ("check that the token has write access to the namespace (`hf auth login`)" if status in (401, 403)
               else "check --repo-id and --revision, then retry (uploads resume)")
        raise HubError(f"the Hub refused the push ({first}): {fix}") from None
    result.repo_url = str(repo_url)
    result.commit_url = info.commit_url
    result.commit_oid = info.oid
    return result


def format_plan(result: PushResult, revision: str | None, private: bool) -> str:
    from paretoq_export.model_card import format_size

    plan = result.plan
    lines = [f"{'dry run: would upload' if result.dry_run else 'uploaded'} {len(plan.files)} files "
             f"({format_size(plan.total_bytes)}) to model repo {result.repo_id} (revision {revision or 'main'}"
             f"{', private' if private else ''})"]
    for f in plan.files:
        mode = "LFS" if f.mode == "lfs" else "regular"
        generated = "  (generated model card)" if f.generated else ""
        lines.append(f"  {mode:<8}{format_size(f.size):>12}  {f.path_in_repo}{generated}")
    if plan.ignored:
        shown = ", ".join(plan.ignored[:8]) + (f", ... ({len(plan.ignored) - 8} more)" if len(plan.ignored) > 8 else "")
        lines.append(f"not uploaded ({len(plan.ignored)}: partial writes, caches, training state): {shown}")
    if result.dry_run:
        lines.append("LFS/regular as the Hub decides it (binary, > 10 MB or an LFS-tracked extension -> LFS); "
                     "LFS files go through hf_xet when it is installed, else the Git LFS batch API")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
HELP = "upload an output folder (with its model card) to the Hugging Face Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="the folder to upload (exported files, validate/bench JSON, README.md)")
    parser.add_argument("--repo-id", required=True, help="model repo USER/NAME or ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be uploaded (path, size, LFS or regular); needs no token")
    parser.add_argument("--revision", default=None, help="branch to commit to (default main; created if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--checkpoint", default=None, help="for a generated model card: the canonical checkpoint")
    parser.add_argument("--base-model", default=None, help="for a generated model card: Hub id of the base model")
    parser.add_argument("--license", default=None, help="for a generated model card: license when none is known")


def run(args: argparse.Namespace) -> int:
    result = push_folder(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, dry_run=args.dry_run, checkpoint=args.checkpoint,
                         base_model=args.base_model, license=args.license)
    if result.card_written:
        print(f"wrote {Path(args.output_dir) / 'README.md'} (model card)")
    print(format_plan(result, args.revision, args.private))
    if not result.dry_run:
        print(f"repo: {result.repo_url}\ncommit: {result.commit_url}")
    return 0
