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


class MedfedError(Exception):
    """Base of every error medfed raises on purpose; its message names the fix.

    Catch this to handle any medfed error; the command lines print its message and exit 2.
    """


class ConfigError(MedfedError, ValueError):
    """An invalid or unknown configuration value; the message names the key and the fix.

    Defined here, not in :mod:`medfed.config` (which re-exports it), because layers below the
    configuration raise it too (e.g. :class:`~medfed.scale.cluster.ClusterError`).
    """


#: Kept for scripts written against the former tuple of user errors: now just MedfedError.
USER_ERRORS: tuple[type[BaseException], ...] = (MedfedError,)


def format_user_error(e: BaseException) -> str:
    """The line a command line prints for a :class:`MedfedError` (no traceback)."""
    return f"medfed: error: {e}"
