from qgw.cli import app

app(prog_name="qgw")
