"""The task-module SDK: declare a module in one file, return a Plan from its `run`.

    from modules import Command, Plan, module, params as p

    @module("disk.usage", category="info", params=[p.Path("path", roots=("/",))])
    def run(path: str) -> Plan:
        \"\"\"Show disk usage of a path.\"\"\"
        return Plan(Command(["du", "-sh", "--", path]))
"""

from modules import params
from modules.params import ParamError
from modules.plan import Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, Shell, TailFile, TempPath
from modules.registry import (
    RESERVED_COMMANDS, RESERVED_PARAMS, Catalog, Module, ModuleLoadError, ModuleSpec, Risk,
    catalog_of, load_modules, module,
)

__all__ = [
    "RESERVED_COMMANDS", "RESERVED_PARAMS", "Catalog", "Command", "Emit", "FirstAvailable", "Module", "ModuleLoadError",
    "ModuleSpec", "ParamError", "Ping", "Plan", "PutFile", "RequireWithin", "Risk", "Shell", "TailFile", "TempPath",
    "catalog_of", "load_modules", "module", "params",
]
