from heteroscale.cli import entry

entry()
