import Config

# Python's None arrives as nil rather than :undefined.
config :pyport, none_as: nil
