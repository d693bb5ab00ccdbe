"""outmetric: gradient descent in the Euclidean metric of the output space, for JAX."""

from importlib import metadata as _metadata

from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import CheckpointLock as CheckpointLock
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._data import Dataset as Dataset
from ._data import bundled_dataset_path as bundled_dataset_path
from ._data import load_dataset as load_dataset
from ._data import load_digits as load_digits
from ._fit import FitResult as FitResult
from ._fit import NonFiniteError as NonFiniteError
from ._fit import fit as fit
from ._flows import AbstractFlow as AbstractFlow
from ._flows import AdaptedFlow as AdaptedFlow
from ._flows import HomotopyFlow as HomotopyFlow
from ._flows import InterpolationFlow as InterpolationFlow
from ._flows import StandardFlow as StandardFlow
from ._flows import adapted_flow as adapted_flow
from ._flows import homotopy_flow as homotopy_flow
from ._flows import interpolation_flow as interpolation_flow
from ._flows import standard_flow as standard_flow
from ._geometry import Regime as Regime
from ._geometry import critical_dimension as critical_dimension
from ._geometry import horizontal as horizontal
from ._geometry import is_equilibrium as is_equilibrium
from ._geometry import jacobian_spectrum as jacobian_spectrum
from ._geometry import numerical_rank as numerical_rank
from ._geometry import pullback_length as pullback_length
from ._geometry import regime as regime
from ._geometry import vertical as vertical
from ._gram import GramStructure as GramStructure
from ._gram import gram_matrix as gram_matrix
from ._gram import gram_structure as gram_structure
from ._gram import structured_gram as structured_gram
from ._integrate import Trajectory as Trajectory
from ._integrate import integrate as integrate
from ._integrate import stopping_time as stopping_time
from ._models import mlp as mlp
from ._problem import AbstractProblem as AbstractProblem
from ._problem import Problem as Problem
from ._problem import num_parameters as num_parameters
from ._residual import PointSet as PointSet
from ._residual import ResidualProblem as ResidualProblem
from ._results import RESULTS as RESULTS
from ._sharding import shard_samples as shard_samples
from ._solve import PRECONDITIONERS as PRECONDITIONERS
from ._solve import SOLVERS as SOLVERS
from ._solve import SolvePlan as SolvePlan
from ._solve import SolveResult as SolveResult
from ._solve import memory_budget as memory_budget
from ._solve import output_metric_gradient as output_metric_gradient
from ._solve import plan_solve as plan_solve
from ._transform import OutputMetricDescentState as OutputMetricDescentState
from ._transform import ScaleByOutputMetricState as ScaleByOutputMetricState
from ._transform import output_metric_descent as output_metric_descent
from ._transform import scale_by_output_metric as scale_by_output_metric

#: The public API: every name above, and nothing else, is outmetric's to keep stable.
__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointLock",
    "load_checkpoint",
    "save_checkpoint",
    "Dataset",
    "bundled_dataset_path",
    "load_dataset",
    "load_digits",
    "FitResult",
    "NonFiniteError",
    "fit",
    "AbstractFlow",
    "AdaptedFlow",
    "HomotopyFlow",
    "InterpolationFlow",
    "StandardFlow",
    "adapted_flow",
    "homotopy_flow",
    "interpolation_flow",
    "standard_flow",
    "Regime",
    "critical_dimension",
    "horizontal",
    "is_equilibrium",
    "jacobian_spectrum",
    "numerical_rank",
    "pullback_length",
    "regime",
    "vertical",
    "GramStructure",
    "gram_matrix",
    "gram_structure",
    "structured_gram",
    "Trajectory",
    "integrate",
    "stopping_time",
    "mlp",
    "AbstractProblem",
    "Problem",
    "num_parameters",
    "PointSet",
    "ResidualProblem",
    "RESULTS",
    "shard_samples",
    "PRECONDITIONERS",
    "SOLVERS",
    "SolvePlan",
    "SolveResult",
    "memory_budget",
    "output_metric_gradient",
    "plan_solve",
    "OutputMetricDescentState",
    "ScaleByOutputMetricState",
    "output_metric_descent",
    "scale_by_output_metric",
    "__version__",
]

try:
    __version__ = _metadata.version("outmetric")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
