//! A list that costs one pointer until its first element.

/// A `Vec` behind an `Option<Box<..>>`: one pointer inline instead of a `Vec`'s three, and no
/// allocation while empty. For lists that sit in every connection's state and are rarely
/// used (a connection's non-default memberships, a membership's recovery buffer), where 16 bytes per connection decide the allocator's size class.
#[derive(Debug)]
#[expect(
    clippy::box_collection,
    reason = "one pointer inline instead of a Vec's three; the extra allocation is rare"
)]
pub struct ThinList<T>(Option<Box<Vec<T>>>);

impl<T> Default for ThinList<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> ThinList<T> {
    /// How many elements it holds.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |list| list.len())
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `item`, allocating the list on the first one.
    pub fn push(&mut self, item: T) {
        self.0.get_or_insert_default().push(item);
    }

    /// The list to change in place, allocated if it was not.
    pub fn as_vec_mut(&mut self) -> &mut Vec<T> {
        self.0.get_or_insert_default()
    }

    /// Keeps the elements `keep` accepts; the allocation goes when none is left.
    pub fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(list) = &mut self.0 {
            list.retain(keep);
            if list.is_empty() {
                self.0 = None;
            }
        }
    }

    /// The elements in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.as_deref().map_or([].iter(), |list| list.iter())
    }

    /// Takes every element, leaving it empty and unallocated.
    pub fn take(&mut self) -> Vec<T> {
        self.0.take().map(|list| *list).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pointer_allocated_only_while_it_holds_something() {
        assert_eq!(
            std::mem::size_of::<ThinList<u64>>(),
            std::mem::size_of::<usize>()
        );
        let mut list = ThinList::default();
        assert!(list.is_empty());
        list.push(1);
        list.as_vec_mut().push(2);
        list.push(3);
        assert_eq!(list.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        list.retain(|n| *n != 2);
        assert_eq!(list.len(), 2);
        list.retain(|_| false);
        assert!(list.0.is_none(), "freed when the last one goes");
        list.push(4);
        assert_eq!(list.take(), [4]);
        assert!(list.0.is_none());
    }
}
