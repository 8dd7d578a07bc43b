"""Pipeline workers and the orders API: consumer-group workers that drive orders through steps.

Public API: the worker and its settings, the step interface and registry, the
payment and status seams, the orders API factory, and the errors.
"""

from .api import create_app
from .config import PipelineConfig
from .errors import (
    CatalogError,
    PaymentDeclined,
    PipelineError,
    ReplayError,
    StepError,
    TransientError,
    UnknownStepError,
)
from .payment import PaymentGateway, SimulatedGateway
from .records import OrderContext, order_histories, order_statuses, read_events
from .status import MqttStatusPublisher, StatusPublisher, StatusSender, status_client
from .status_query import StatusQueryResponder
from .steps import Step, StepDeps, build_chain, register
from .stock import stock_levels
from .worker import Worker

__all__ = [
    "CatalogError",
    "MqttStatusPublisher",
    "OrderContext",
    "PaymentDeclined",
    "PaymentGateway",
    "PipelineConfig",
    "PipelineError",
    "ReplayError",
    "SimulatedGateway",
    "StatusPublisher",
    "StatusQueryResponder",
    "StatusSender",
    "Step",
    "StepDeps",
    "StepError",
    "TransientError",
    "UnknownStepError",
    "Worker",
    "build_chain",
    "create_app",
    "order_histories",
    "order_statuses",
    "read_events",
    "register",
    "status_client",
    "stock_levels",
]
