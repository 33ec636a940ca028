"""The task-module SDK: declare a module in one file, return a Plan from its `run`.

    from ombot.modules import Command, Plan, module, params as p

    @module("disk.usage", category="info", params=[p.Path("path", roots=("/",))])
    def run(path: str) -> Plan:
        \"\"\"Show disk usage of a path.\"\"\"
        return Plan(Command(["du", "-sh", "--", path]))
"""

from ombot.modules import params
from ombot.modules.params import Param, ParamError, within, yes_or_no
from ombot.modules.plan import (
    AgentSetup, Arg, Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, SaltState, Shell, Step,
    TailFile, TempPath,
)
from ombot.modules.registry import (
    RESERVED_COMMANDS, RESERVED_PARAMS, Catalog, Concurrency, Module, ModuleLoadError, ModuleSpec, Risk,
    catalog_of, load_modules, module,
)

__all__ = [
    "RESERVED_COMMANDS", "RESERVED_PARAMS", "AgentSetup", "Arg", "Catalog", "Command", "Concurrency", "Emit", "FirstAvailable", "Module", "ModuleLoadError",
    "ModuleSpec", "Param", "ParamError", "Ping", "Plan", "PutFile", "RequireWithin", "Risk", "RunPlaybook", "SaltState", "Shell", "Step", "TailFile", "TempPath",
    "catalog_of", "load_modules", "module", "params", "within", "yes_or_no",
]
