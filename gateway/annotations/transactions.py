"""The record of annotation searches: who asked what, when, and how many results they got."""
from sqlalchemy import insert, select

from ..db import db, write_transaction
from ..models import search_transactions

ADDRESS_LENGTH = search_transactions.c.client_address.type.length


def record(transaction_id, started_at, call, query_json, client_address, num_results):
    with write_transaction(single_statement=True) as session:
        session.execute(
            insert(search_transactions).values(
                id=transaction_id,
                created_at=started_at,
                client_address=(client_address or "")[:ADDRESS_LENGTH] or None,
                call=call,
                query=query_json,
                num_results=num_results,
            )
        )


def recent(limit=20):
    """The latest `limit` transactions, newest first."""
    statement = select(search_transactions).order_by(search_transactions.c.created_at.desc()).limit(limit)
    return db.session.execute(statement).all()
