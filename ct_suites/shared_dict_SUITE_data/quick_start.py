from erlang import SharedDict

def process_with_config(sd_handle):
    # Wrap the handle
    sd = SharedDict(sd_handle)

    # Dict-like access
    config = sd['config']
    host = config.get('host') or config.get(b'host')

    # Set values
    sd['result'] = {'status': 'ok', 'count': 42}

    # Check membership
    if 'config' in sd:
        print("Config found")

    # Iterate keys
    for key in sd.keys():
        print(f"Key: {key}")

    # Delete
    del sd['result']
