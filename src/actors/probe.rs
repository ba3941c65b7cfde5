//! Unit tests' stand-in for whoever an actor sends `M` to (a session, a
//! rendezvous side): it records every `M`, and [`Seen`] reads them back.

use std::marker::PhantomData;

use actix::{Actor, Context, Handler, Message, MessageResult};

/// Records the `M`s it is sent.
pub struct Probe<M>(Vec<M>);

impl<M> Default for Probe<M> {
    fn default() -> Self {
        Probe(Vec::new())
    }
}

impl<M: Unpin + 'static> Actor for Probe<M> {
    type Context = Context<Self>;
}

impl<M> Handler<M> for Probe<M>
where
    M: Message<Result = ()> + Unpin + 'static,
{
    type Result = ();
    fn handle(&mut self, msg: M, _: &mut Context<Self>) {
        self.0.push(msg);
    }
}

/// What a probe has received so far (its mailbox is in order, so this
/// comes after everything sent to it before).
pub struct Seen<M>(PhantomData<M>);

impl<M> Seen<M> {
    pub fn new() -> Self {
        Seen(PhantomData)
    }
}

impl<M: 'static> Message for Seen<M> {
    type Result = Vec<M>;
}

impl<M> Handler<Seen<M>> for Probe<M>
where
    M: Message<Result = ()> + Clone + Unpin + 'static,
{
    type Result = MessageResult<Seen<M>>;
    fn handle(&mut self, _: Seen<M>, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.0.clone())
    }
}
