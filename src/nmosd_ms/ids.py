"""Participant and session identifiers: checked once, because they become parts of file names.

A leaf module (it imports nothing of the package but its errors), so that every step can check
an ID without importing another step.
"""

from __future__ import annotations

import re

from .errors import NmosdError

#: A participant ID becomes part of file names (``<id>.npy``, ``<id>_saliency.nii.gz``), so it is
#: checked once, here: letters and digits (any script), ``-``, ``_`` and ``.``; no leading ``.``,
#: no ``..``; at most 128 characters. BIDS labels (``sub-<alphanumeric>``) always pass.
MAX_ID_LENGTH = 128
_ID_CHARS = re.compile(r"[\w.-]+")  # \w: letters, digits and "_" in any script
BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")


def validate_participant_id(pid: str, where: str = "") -> str:
    """Return ``pid`` if it is safe as part of a file name, else raise one user error."""
    at = f"{where}: " if where else ""
    shown = pid.encode("unicode_escape").decode("ascii")[:60]
    if not pid:
        raise NmosdError(f"{at}a row has an empty participant_id")
    if (
        len(pid) > MAX_ID_LENGTH
        or not _ID_CHARS.fullmatch(pid)
        or pid.startswith(".")
        or ".." in pid
        or not pid.isprintable()
    ):
        raise NmosdError(
            f"{at}participant_id '{shown}' is not allowed: use letters, digits, '-', '_' and '.' "
            f"(not first, never '..'), at most {MAX_ID_LENGTH} characters"
        )
    return pid


_BIDS_SESSION = re.compile(r"ses-[A-Za-z0-9]+")


def validate_session_id(session_id: str, participant_id: str = "") -> str:
    """Return ``session_id`` if it is "" or a BIDS session label (``ses-<letters, digits>``)."""
    if session_id and not _BIDS_SESSION.fullmatch(session_id):
        raise NmosdError(
            f"participant {participant_id}: session_id '{session_id[:40]}' is not a BIDS "
            "session label (ses-<letters and digits>)"
        )
    return session_id


def ids_in_bids_name(name: str) -> tuple[str, str] | None:
    """The participant and session a BIDS file name carries: ``sub-01_ses-02_FLAIR.nii.gz`` ->
    ``("sub-01", "ses-02")``, ``sub-01_FLAIR.nii.gz`` -> ``("sub-01", "")``; None without a
    ``sub-<label>`` entity. The labels still need :func:`validate_participant_id`."""
    found = re.search(rf"(?:^|_)({BIDS_SUBJECT.pattern})", name)
    if found is None:
        return None
    session = re.search(rf"_({_BIDS_SESSION.pattern})", name)
    return found.group(1), session.group(1) if session else ""


def scan_key(participant_id: str, session_id: str = "") -> str:
    """``sub-01`` + ``ses-02`` -> ``sub-01_ses-02`` (the participant alone without a session)."""
    return f"{participant_id}_{session_id}" if session_id else participant_id
