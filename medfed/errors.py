"""The errors medfed raises on purpose: one hierarchy under :class:`MedfedError`.

Each error's message names the fix, so the command lines print it (``medfed: error: ...``)
instead of a traceback and exit with status 2; :class:`~medfed.fl.messages.FederationError`
(a run that started but could not finish, e.g. too few hospitals left after faults) exits
with status 1.

Every subclass also keeps its builtin base (``ValueError`` for input that cannot be used,
``RuntimeError`` for an environment or a run that cannot go on), so ``except ValueError`` code
keeps working. The subclasses live beside the code that raises them:

* :class:`ConfigError` (here; :mod:`medfed.config` re-exports it), with
  :class:`~medfed.scale.cluster.ClusterError` and
  :class:`~medfed.experiments.sweep.spec.SweepError`;
* :mod:`medfed.data`: ``DatasetError``, ``PartitionError``; :mod:`medfed.embed`:
  ``BackboneError``;
* :mod:`medfed.crypto`: ``UnsafeParametersError``, ``CiphertextError``, ``KeyMaterialError``,
  ``ChannelError``, ``LayoutError``, and ``ThresholdUnavailableError``,
  ``ThresholdParamsError``, ``ThresholdError`` (:mod:`medfed.crypto.threshold`);
* :mod:`medfed.fl`: ``ProtocolError``, ``FederationError``, ``FaultSpecError``.

This module is the bottom import layer: it imports nothing from medfed, so every layer can
subclass :class:`MedfedError` (``lint-imports`` checks the layers; see pyproject.toml).
"""

from __future__ import annotations

import re


class MedfedError(Exception):
    """Base of every error medfed raises on purpose; its message names the fix.

    Catch this to handle any medfed error; the command lines print its message and exit 2.
    """


class ConfigError(MedfedError, ValueError):
    """An invalid or unknown configuration value; the message names the key and the fix.

    Defined here, not in :mod:`medfed.config` (which re-exports it), because layers below the
    configuration raise it too (e.g. :class:`~medfed.scale.cluster.ClusterError`).
    """


#: Words of third-party advice that would make a load unsafe: torch's "retry with
#: weights_only=False", numpy's "load it unsafely using allow_pickle= or pickle.load()",
#: Hugging Face's trust_remote_code.
_UNSAFE_ADVICE = re.compile(
    r"weights_only|allow_pickle|trust_remote_code|safe_globals|pickle\.load|load it unsafely",
    re.IGNORECASE,
)


def without_unsafe_advice(text: str) -> str:
    """``text`` (an error message medfed relays) without the sentences that name an unsafe way
    to load a file (e.g. ``weights_only=False``, ``allow_pickle=True``): medfed's errors say
    what is wrong and the safe fix, never how to unpickle an untrusted file."""
    text = str(text)
    if not _UNSAFE_ADVICE.search(text):
        return text
    parts = re.split(r"(?<=[.!?])(\s+)", text)  # sentence, separator, sentence, ...
    kept = []
    for k in range(0, len(parts), 2):
        if not _UNSAFE_ADVICE.search(parts[k]):
            kept.append(parts[k] + (parts[k + 1] if k + 1 < len(parts) else ""))
    return "".join(kept).strip()


def format_user_error(e: BaseException) -> str:
    """The line a command line prints for a :class:`MedfedError` (no traceback); a sentence
    relayed from a library that advises an unsafe load is left out (:func:`without_unsafe_advice`).
    """
    return f"medfed: error: {without_unsafe_advice(str(e))}"


def unknown_keys(keys: list[str], valid: list[str]) -> str:
    """``'k' (did you mean 'key'?), ...`` for each of ``keys``, the closest of ``valid`` named."""
    import difflib

    hints = []
    for k in keys:
        close = difflib.get_close_matches(k, valid, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)
