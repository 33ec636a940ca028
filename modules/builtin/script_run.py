from ombot.modules import Command, Plan, PutFile, TempPath, module, params as p


@module("script.run", category="exec", risk="high", params=[
    p.Script("script", help="script text; start it with #! naming its interpreter"),
    p.Args("args", help="arguments, quoted as in a shell: a 'b c' is two", required=False, default=""),
])
def run(script: str, args: list[str]) -> Plan:
    """Push a script to each host and run it with arguments (never through a shell)."""
    path = TempPath("script")
    return Plan(PutFile(path, content=script, mode=0o700), Command([path, *args]))
