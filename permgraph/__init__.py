"""permgraph: trace any PyTorch model into a verified graph of permutation-coupled axes.

Public API (everything else is private)::

    spec = permgraph.trace(model)                 # verified PermutationSpec
    perm = permgraph.random_permutation(spec, 0)  # one permutation per group
    model2 = permgraph.apply(model, spec, perm)   # same function, units reordered
"""

from . import data as data
from . import models as models
from . import prune as prune
from ._eval import evaluate as evaluate
from ._trace import trace as trace
from ._verify import EquivalenceResult as EquivalenceResult
from ._verify import check_equivalence as check_equivalence
from .alignment import Alignment as Alignment
from .alignment import align as align
from .alignment import compose as compose
from .alignment import identity_alignment as identity_alignment
from .errors import FileFormatError as FileFormatError
from .errors import PermgraphError as PermgraphError
from .errors import SpecMismatchError as SpecMismatchError
from .errors import TraceError as TraceError
from .errors import UnknownNameError as UnknownNameError
from .errors import VerificationError as VerificationError
from .interpolation import BarrierCurve as BarrierCurve
from .interpolation import barrier as barrier
from .interpolation import interpolate as interpolate
from .interpolation import reset_bn as reset_bn
from .permutation import Permutation as Permutation
from .permutation import apply as apply
from .permutation import identity as identity
from .permutation import inverse as inverse
from .permutation import random_permutation as random_permutation
from .prune import Mask as Mask
from .prune import imp as imp
from .prune import transfer_mask as transfer_mask
from .spec import AxisRef as AxisRef
from .spec import FrozenPart as FrozenPart
from .spec import Group as Group
from .spec import PermutationSpec as PermutationSpec
from .training import TrainConfig as TrainConfig
from .training import TrainResult as TrainResult
from .training import train as train

__version__ = "0.1.0"

__all__ = [
    "Alignment", "AxisRef", "BarrierCurve", "EquivalenceResult", "FileFormatError", "FrozenPart", "Group", "Mask", "Permutation", "PermgraphError",
    "PermutationSpec", "SpecMismatchError", "TraceError", "TrainConfig", "TrainResult", "UnknownNameError", "VerificationError", "align", "apply", "barrier", "check_equivalence",
    "compose", "data", "evaluate", "identity", "identity_alignment", "imp", "interpolate", "inverse", "models", "prune", "random_permutation", "reset_bn", "trace", "train", "transfer_mask",
]
