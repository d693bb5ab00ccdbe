"""outmetric: gradient descent in the Euclidean metric of the output space, for JAX."""

import importlib.metadata

from ._data import Dataset as Dataset
from ._data import bundled_dataset_path as bundled_dataset_path
from ._data import load_dataset as load_dataset
from ._fit import FitResult as FitResult
from ._fit import NonFiniteError as NonFiniteError
from ._fit import fit as fit
from ._flows import AbstractFlow as AbstractFlow
from ._flows import AdaptedFlow as AdaptedFlow
from ._flows import StandardFlow as StandardFlow
from ._flows import adapted_flow as adapted_flow
from ._flows import standard_flow as standard_flow
from ._integrate import Trajectory as Trajectory
from ._integrate import integrate as integrate
from ._integrate import stopping_time as stopping_time
from ._models import mlp as mlp
from ._problem import Problem as Problem
from ._problem import num_parameters as num_parameters
from ._solve import SOLVERS as SOLVERS
from ._solve import SolveResult as SolveResult
from ._solve import output_metric_gradient as output_metric_gradient
from ._transform import OutputMetricDescentState as OutputMetricDescentState
from ._transform import ScaleByOutputMetricState as ScaleByOutputMetricState
from ._transform import output_metric_descent as output_metric_descent
from ._transform import scale_by_output_metric as scale_by_output_metric

try:
    __version__ = importlib.metadata.version("outmetric")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
