"""`python -m shelfsight`: the installed `shelfsight` command. The core does not import the parts, so
it finds the command's composition root (shelfsight.app.cli) the way the console script does."""
import sys
from importlib.metadata import entry_points

(command,) = entry_points(group="console_scripts", name="shelfsight")
sys.exit(command.load()())
