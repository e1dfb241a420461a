"""The layout a reader relies on: each source file readable in one sitting, no module importing another
that imports it back, and GRPO's update short enough to read as its loop."""
import ast
import glob
import inspect
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py"))
                 + glob.glob(os.path.join(ROOT, "runs", "*.py")))


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def imports_at_load(path):
    """The project modules `path` imports when it is loaded (module level, not inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names, here = set(), module_name(path)
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .records import ... inside data/
                names.add(here.rsplit(".", 1)[0] + "." + node.module if node.module else here.rsplit(".", 1)[0])
            elif node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_source_file_is_over_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in SOURCES if (n := len(open(p, encoding="utf-8").readlines())) > 600}
    assert not long, long


def test_no_import_circle():
    project = {module_name(p): p for p in SOURCES}
    graph = {m: {n for n in imports_at_load(p) if n in project and n != m} for m, p in project.items()}
    assert graph["grpo"] >= {"rollouts", "trainer"} and "engine" in graph["rollouts"]  # the parser sees imports

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [c for m in graph if (c := cycle_from(m))]
    assert not circles, circles[0]


def test_engine_is_a_leaf():
    """The sampler imports no module of the project at load time (its __main__ check may import vlm)."""
    project = {module_name(p) for p in SOURCES}
    assert not imports_at_load(os.path.join(ROOT, "engine.py")) & project


def test_the_update_reads_as_its_loop():
    import grpo
    assert len(inspect.getsource(grpo.update).splitlines()) <= 40
