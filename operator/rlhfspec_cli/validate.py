"""``rlhfspec validate FILE...``: check manifests, one line per problem, and always a summary.

Where it sits: ``main`` dispatches the ``validate`` sub-command here; each file goes through
the same ``load_documents`` + ``parse_rlhfjob`` the local runner uses (the operator runs
``parse_rlhfjob`` on what the API server stores). A file that cannot be read or checked is
reported and counted, and the next file is checked: one bad file never hides the rest, and
the summary line ``N files, M valid, K invalid, E unreadable`` is printed in every case.

Output: problems go to stderr as ``file: field.path: what is wrong (what is allowed)``. When
every file is valid, stdout gets one line ``valid: N RLHFJob(s): ...`` that ends with the
summary; otherwise stderr ends with ``invalid: ...`` and the summary. Exit 0 when every file
is valid, 1 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rlhfspec_api.echo import echo
from rlhfspec_api.manifest import DocumentError, ManifestError, load_documents, parse_rlhfjob

# The success line names the first jobs only: validating 1,000 files must not print a line
# of 80,000 characters.
MAX_JOBS_LISTED = 10


@dataclass
class Summary:
    """What one ``validate`` call found."""

    files: int = 0
    valid: int = 0
    invalid: int = 0
    unreadable: int = 0
    problem_documents: int = 0
    jobs: list[str] = field(default_factory=list)
    """One description per valid RLHFJob document."""

    @property
    def ok(self) -> bool:
        return self.invalid == 0 and self.unreadable == 0

    def line(self) -> str:
        return (
            f"{self.files} files, {self.valid} valid, {self.invalid} invalid, "
            f"{self.unreadable} unreadable"
        )


def _check_file(name: str, summary: Summary, err: TextIO) -> None:
    try:
        documents = load_documents(Path(name))
    except DocumentError as exc:
        print(exc, file=err)
        summary.unreadable += 1
        return
    if not documents:
        print(f"{name}: no YAML documents", file=err)
        summary.invalid += 1
        return
    failed = False
    for document in documents:
        try:
            job = parse_rlhfjob(document.content)
        except ManifestError as exc:
            failed = True
            summary.problem_documents += 1
            for error in exc.errors:
                print(f"{document.label}: {error}", file=err)
            continue
        spec = job.spec
        summary.jobs.append(
            f"{job.name} ({spec.algorithm.name.value}, {spec.generation.replicas} generation "
            f"replica(s), speculative {spec.generation.speculative.mode.value})"
        )
    if failed:
        summary.invalid += 1
    else:
        summary.valid += 1


def validate_files(names: Sequence[str], out: TextIO, err: TextIO) -> Summary:
    """Check every file of ``names``, print problems and the summary; return the counts."""
    summary = Summary()
    for name in names:
        summary.files += 1
        try:
            _check_file(name, summary, err)
        except Exception as exc:  # last resort: the next file is still checked
            # Not expected (bounded parsing refuses hostile input with a message); if it
            # happens, the file is reported like an unreadable one rather than ending the run.
            print(f"{name}: internal error while checking: {echo(repr(exc))}", file=err)
            summary.unreadable += 1
    if summary.ok:
        listed = "; ".join(summary.jobs[:MAX_JOBS_LISTED])
        more = len(summary.jobs) - MAX_JOBS_LISTED
        if more > 0:
            listed += f"; and {more} more"
        print(f"valid: {len(summary.jobs)} RLHFJob(s): {listed} ({summary.line()})", file=out)
    else:
        print(
            f"invalid: {summary.problem_documents} problem document(s); {len(summary.jobs)} "
            f"valid RLHFJob(s) ({summary.line()})",
            file=err,
        )
    return summary
