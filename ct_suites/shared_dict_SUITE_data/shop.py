"""The `shop` module the reference's Session State example calls
(py:call(shop, add_to_cart, [Session, ItemId])). shared_dict_SUITE puts this
directory on sys.path."""
from erlang import SharedDict


def add_to_cart(session, item_id):
    sd = SharedDict(session)
    if sd.get('user_id') is None:
        raise ValueError('session has no user')
    cart = sd['cart']
    cart.append(item_id)
    sd['cart'] = cart
    return len(cart)
