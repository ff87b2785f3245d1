from erlang import SharedDict

def process_data(sd_handle):
    sd = SharedDict(sd_handle)
    db_config = sd['db']

    # Use config to connect to database
    conn = connect(
        host=db_config.get('host') or db_config.get(b'host'),
        port=db_config.get('port') or db_config.get(b'port')
    )

    # Store results back
    sd['results'] = {'rows_processed': 1000}
