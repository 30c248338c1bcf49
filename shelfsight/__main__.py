"""`python -m shelfsight`: the installed `shelfsight` command. The core imports none of the parts, so
it does not import the command's composition root (shelfsight.app.cli) either: it runs what the
project's console script names, the way the `shelfsight` executable does."""
import sys
from importlib.metadata import entry_points

found = [ep for ep in entry_points(group="console_scripts", name="shelfsight")
         if ep.dist is None or ep.dist.name == "shelfsight"]
if not found:
    sys.exit("shelfsight: the project is not installed in this Python (`make env`, or `pip install -e .`)")
sys.exit(found[0].load()())
