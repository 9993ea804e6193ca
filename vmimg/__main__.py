from vmimg.cli import entry

entry()
