from .cli.run import main_exit

main_exit()
