from bids_app.cli.run import main_exit

main_exit()
