"""The app of issue 13's example, for the graph's unit tests (never run: read only)."""
import shardworker

app = shardworker.App("shop", broker="kafka://127.0.0.1:1")
orders = app.topic("orders", value_serializer="json")
customers = app.topic("customers", key_serializer="str", value_serializer="json")
lines = app.topic("lines", value_serializer="str")
words = app.topic("words", key_serializer="str", value_serializer="json")
audit = app.topic("audit", value_serializer="json")
by_customer = app.table("by_customer", default=int)
names = app.table("names")
word_counts = app.table("word_counts", default=int)
unused = app.table("unused")
side_effects = []


def remember(key, value):
    """A helper an agent calls: the table it writes links the agent to it."""
    names[key] = value


@app.agent(orders)
async def spend(stream):
    side_effects.append("ran")  # reading the graph must never run an agent
    async for order in stream.group_by(lambda o: o["customer"], name="by-customer"):
        by_customer[order["customer"]] += order["amount"]
        yield {"customer": order["customer"], "name": names.get(order["customer"])}


@app.agent(customers)
async def keep_names(stream):
    async for key, c in stream.items():
        remember(key, c["name"])


@app.agent(lines)
async def split(stream):
    async for line in stream:
        for w in line.split():
            await words.send(key=w, value=1)


@app.agent(words)
async def count(stream):
    async for key, n in stream.items():
        word_counts[key] += n


@app.agent(audit)
async def audit_through(stream):
    async for event in stream.through(words):
        word_counts[event] += 1
